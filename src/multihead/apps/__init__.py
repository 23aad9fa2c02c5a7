"""Applications built on the library: translation, image recognition, speech recognition."""
