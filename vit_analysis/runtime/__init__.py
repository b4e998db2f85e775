"""What every stage runs on: devices and meshes, compilation, progress, resumable partial state."""
