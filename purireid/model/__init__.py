"""The network: the multi-view ResNet (backbones by name) and group BatchNorm."""
