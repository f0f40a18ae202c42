"""Values in MLflow search filters (`search_runs`, the runs page's searchFilter, logged models),
quoted so that any study name the grammar can carry is matched exactly.

MLflow 3 (mlflow/utils/search_utils.py) tokenizes a filter with sqlparse and takes a string value
as the token's text less its first and last character: there are no escapes. sqlparse reads
`'...'` as `'(''|\\'|[^'])*'` and `"..."` as `"(""|\\"|[^"])*"`, and MLflow accepts both
(`_strip_quotes`). So a value without `'` goes between single quotes and one without `"` between
double quotes; a value with both kinds of quote cannot be written, nor one that ends in a
backslash (it would escape its closing quote). Such values are refused with `check_filter_value`
where they are given (the study name: sweep.study_name).
"""

from __future__ import annotations

from mnist_sweep.base.errors import ConfigError


def uncarriable(value: str) -> str | None:
    """Why MLflow's filter grammar cannot carry `value` (None: it can)."""
    if "'" in value and '"' in value:
        return "it has both a single quote (') and a double quote (\")"
    if value.endswith("\\"):
        return "it ends in a backslash"
    return None


def check_filter_value(value: str, what: str) -> None:
    """Refuse a value (`what` names the setting, e.g. sweep.study_name) that MLflow's search
    filters cannot match: its runs could not be found again (to end them) or linked to."""
    reason = uncarriable(value)
    if reason is not None:
        raise ConfigError(
            f"{what}={value!r} is not allowed: {reason}, and MLflow's search filters, which "
            "find a study's runs by this name, have no way to write such a value. Use a name "
            "with at most one kind of quote and no backslash at its end (spaces, other "
            "punctuation and non-ASCII letters are fine)."
        )


def filter_value(value: str, what: str = "a search filter's value") -> str:
    """`value` as a string literal of MLflow's search filter grammar: 'it' or "it's"."""
    check_filter_value(value, what)
    return f'"{value}"' if "'" in value else f"'{value}'"


def filter_key(key: str) -> str:
    """A tag or param key in backticks (`key`): any character but a backtick."""
    if "`" in key:
        raise ValueError(f"{key!r}: a key with a backtick cannot be searched in MLflow")
    return f"`{key}`"


def tag_equals(tags: dict[str, str]) -> str:
    """The filter `tags.`k` = 'v' and ...` of runs that carry all of `tags`."""
    return " and ".join(
        f"tags.{filter_key(k)} = {filter_value(str(v), f'the tag {k}')}" for k, v in tags.items()
    )
