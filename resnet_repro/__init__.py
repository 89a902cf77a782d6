"""resnet_repro: the CIFAR-10 experiments of He et al. 2015 (section 4.2), faithful and fast."""

__version__ = "0.1.0"
