"""Reading images and datasets (MVTec AD / 3D-AD / LOCO / VisA layouts, plain folders) and the
embedded synthetic dataset."""
