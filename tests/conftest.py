import os
import sys

# Tests import the project as the scripts do: from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _restore_render_filter():
    """load_model sets the renderer's process-wide 2D filter (models.mip_filter.set_render_filter) to the model's:
    every test module starts from the classic default, whatever an earlier module loaded (inside a module, models
    loaded by its fixtures keep rendering with their own filter)."""
    from models import renderer

    renderer.FILTER_2D = None
    yield
    renderer.FILTER_2D = None
