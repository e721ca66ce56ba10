"""STGC's reporting: TensorBoard's layout, histograms and images, the figures, the picture's protocol."""
