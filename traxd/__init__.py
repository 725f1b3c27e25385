"""traxd: a daemon that turns dropped audio and video files into transcripts."""

__version__ = "0.1.0"
