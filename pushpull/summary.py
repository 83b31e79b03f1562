"""What each script says at the end of a run, and every few seconds during it: the
[STATS] line, the --csv row, the summary table and its JSON (--json), and the exit
status with its one-line reason.

The scripts gather the counts; this module only turns them into lines, rows and
dictionaries, so a reader of a script sees what is counted, not how it is printed.
"""

# ---------------------------------------------------------------------------
# The receiver's
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The sender's
# ---------------------------------------------------------------------------
