"""The run record, the summary a run prints, and the sweep report."""
