"""The `ddim-invert` command: make-tiny-model, local, gateway, worker and submit."""
