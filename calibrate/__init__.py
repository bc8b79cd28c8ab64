"""Stage 1, calibration: collect FitPrune attention statistics on a small set and search a pruning recipe.

    from calibrate import CalibrationConfig, calibrate
    result = calibrate(CalibrationConfig(model="tiny", reduction=0.6), out="runs/demo/recipe.json")
"""

from calibrate.config import CalibrationConfig
from calibrate.inspect import inspect_recipes
from calibrate.recipe import Recipe, check_recipe_fits, load_recipe, recipe_from_dict, save_recipe
from calibrate.stage import CalibrationResult, calibrate

__all__ = [
    "CalibrationConfig", "CalibrationResult", "Recipe", "calibrate", "check_recipe_fits", "inspect_recipes",
    "load_recipe", "recipe_from_dict", "save_recipe",
]
