"""The MONAI integration: ``monai.visualize``-style CAM classes and dictionary transforms."""
