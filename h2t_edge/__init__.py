"""h2t-edge: Head2Toe transfer learning for edge devices."""

__version__ = "0.1.0"
