"""GLIGEN-style layout-to-image generation: grounding adapters on frozen Stable Diffusion UNets."""

from gligen.layout import Entity, Layout, load_layouts, save_layouts

__all__ = ["Entity", "Layout", "load_layouts", "save_layouts"]
