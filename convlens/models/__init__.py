"""Architectures, Keras import and preprocessing."""

from convlens.models.network import Graph, Model, Node
from convlens.models.preprocess import Preprocess

__all__ = ["Graph", "Model", "Node", "Preprocess"]
