"""HTTP routes: thin; logic lives in app.services."""
