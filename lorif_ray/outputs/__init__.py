"""What a run hands a person: the folders it may write into (``folders``), the page of a query run
(``report_page``: report.html) and the logged summaries of stage reports (``summary``)."""
