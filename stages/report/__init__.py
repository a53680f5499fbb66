"""The report stage: every table, paper table and plot from output/runs, and the one page that shows them."""
