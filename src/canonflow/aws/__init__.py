"""canonflow on AWS Lambda (the ``aws`` extra): handlers per stage
(:mod:`canonflow.aws.handlers`), ``sqs://`` and ``lambda://`` dispatchers
(:mod:`canonflow.aws.dispatch`), Secrets Manager credentials (:mod:`canonflow.aws.secrets`)
and the SAM template (``canonflow aws template``)."""

from __future__ import annotations

from importlib.resources import files


def template() -> str:
    """The SAM template shipped with the package."""
    return files("canonflow.aws").joinpath("template.yaml").read_text()


def dockerfile() -> str:
    """The Dockerfile of the functions' image (the template's ``DockerContext``)."""
    return files("canonflow.aws").joinpath("Dockerfile").read_text()
