"""ControlNet training tool: a drop-in replacement for diffusers' ControlNet training examples."""
