"""fedmerge: federated cross-domain sequential recommendation by model merging."""

__version__ = "0.1.0"
