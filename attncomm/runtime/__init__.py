"""The framework around the stages: typed config schemas, the stage registry and run context, tracking."""
