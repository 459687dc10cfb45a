"""The wire front of modelgate: everything a MongoDB driver talks to."""
