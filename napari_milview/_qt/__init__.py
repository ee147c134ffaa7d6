"""napari dock widgets (Qt through qtpy); the engine itself never imports Qt."""
