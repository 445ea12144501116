"""ledger: an event-sourced customer interaction ledger."""
