"""``python -m jaxflip.models``: the flavors and their parameter counts."""

from jaxflip.models.flavors import format_param_counts

print(format_param_counts())
