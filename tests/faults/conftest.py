from tests.integration.conftest import lab_dir, settings  # noqa: F401 - shared fixtures
