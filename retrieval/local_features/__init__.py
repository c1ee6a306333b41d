"""Local features: keypoints, scales and descriptors of one image, for spatial verification.

``features.py`` holds the common types; ``extractor.py`` picks an extractor by name;
``rootsift.py`` is the offline default (OpenCV SIFT + RootSIFT); ``delf_hub.py`` loads DELF
through TensorFlow Hub.
"""
