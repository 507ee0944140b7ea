"""groundlabel, the application: the command line on top of the loop's packages.

Layers, top to bottom (imports point down only; `make lint` checks it with import-linter):

    groundlabel                     the CLI: a table of verbs, flags generated from the configs
    pipelines | train | serve       label + review jobs | retraining | the online endpoint
    grounding                       the domain: boxes, families, engines, formats, storage,
                                    settings, the reviewed-label store, the adapter registry

See docs/architecture.md.
"""
