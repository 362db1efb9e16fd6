"""citrus_edge.report: the sweep's results file and the reports made from it (torch-free).

- `sweep_results`: the `results.json` schema, the one table every report shows (`COLUMNS`,
  `table_rows`), `results.csv` and `report.md`, the Pareto front, `--compare`'s ratio table;
- `sweep_html`: the self-contained `report.html` with its plots (matplotlib, imported on use).

The sweep itself (builds, `bench`, evaluation) runs in `citrus_edge/cli/sweep_command.py`; this
package only reads the cells it records, so it imports no stage and no CLI.
"""
