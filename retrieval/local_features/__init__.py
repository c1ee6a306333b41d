"""Local features: keypoints, scales and descriptors of one image, for spatial verification.

``extractor.py`` holds the common types and picks an extractor by name; ``rootsift.py`` is the
offline default (OpenCV SIFT + RootSIFT); ``delf_hub.py`` loads DELF through TensorFlow Hub.
"""
