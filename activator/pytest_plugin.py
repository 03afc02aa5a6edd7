"""pytest plugin (registered through the ``pytest11`` entry point); fixtures come with activator.testing."""
