"""The procedural synthetic fine-grained world: scenes (`render.py`), sets (`sets.py`), generation (`world.py`)."""
