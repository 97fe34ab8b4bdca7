"""``python -m elsa.report``: the sweep report (elsa/report/tables.py)."""
import sys

from elsa.report.tables import main

sys.exit(main())
