"""The core: explainer, methods, capture, traced geometry, placement, audit, regions and
sliding windows. It knows tensors and modules, never files."""
