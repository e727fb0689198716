"""Models: ResNet-style backbones, the routed SDRnet and the exported sub-net model."""

from sdr_edge.models.classifier import SubnetModel
from sdr_edge.models.resnet import Backbone, BackboneConfig
from sdr_edge.models.sdrnet import SDRnet

__all__ = ["Backbone", "BackboneConfig", "SDRnet", "SubnetModel"]
