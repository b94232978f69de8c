"""Using a trained model: the Python API, gallery search, export, the `purireid` command and doctor."""
