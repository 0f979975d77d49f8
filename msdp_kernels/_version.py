# The one version of the distribution (modelstock-dynopool): setup.py reads this line, and
# modelstock / dynopool re-export it. It lives in the bottom package because both others may
# import it without importing each other.
__version__ = "0.2.0"
