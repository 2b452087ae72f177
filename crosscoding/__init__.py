"""crosscoding — the library the stage scripts share (README, Files). Importing the package loads nothing:
the viewer imports `crosscoding.measures` without torch."""
