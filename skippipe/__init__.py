"""skippipe: pipeline schedules (simulator, skip/reorder path scheduler, pipeline
runtime). Works on plain inputs and never imports holmes. Built by a later issue."""
