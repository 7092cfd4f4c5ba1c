# The repository root is on sys.path through pyproject.toml's [tool.pytest.ini_options] pythonpath.
import pytest


@pytest.fixture(autouse=True, scope="module")
def _restore_render_filter():
    """load_model sets the renderer's process-wide 2D filter (models.mip_filter.set_render_filter) to the model's
    (and its compensation):
    every test module starts from the classic default, whatever an earlier module loaded (inside a module, models
    loaded by its fixtures keep rendering with their own filter)."""
    from models import renderer

    renderer.FILTER_2D, renderer.FILTER_2D_COMPENSATION = None, "opacity"
    yield
    renderer.FILTER_2D, renderer.FILTER_2D_COMPENSATION = None, "opacity"
