"""Everything that turns documents into predictions. Never imports `proxy`."""
