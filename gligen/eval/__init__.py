"""GLIP-style evaluation: generate from held-out layouts, detect the phrases, score AP and layout success."""
