"""Configuration: the schema and its validation, named recipes, the stage table (which keys each
stage reads) and the runs of an ablation or sweep."""
