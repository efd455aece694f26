"""ViSAudio-RT: streaming video + head rotation -> binaural audio."""
__version__ = "0.1.0"
