"""One module per `sae` subcommand. Each defines ``register(subparsers)``; the CLI discovers them."""
