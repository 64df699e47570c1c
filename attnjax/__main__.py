"""`python -m attnjax variants [README.md]`: print the variant table, or rewrite it in a README."""

import sys

from attnjax import registry


def main(argv: list[str]) -> None:
  if not argv or argv[0] != "variants":
    sys.exit("usage: python -m attnjax variants [README.md]")
  if len(argv) == 1:
    print(registry.markdown_table())
    return
  with open(argv[1]) as f:
    updated = registry.update_readme(f.read())
  with open(argv[1], "w") as f:
    f.write(updated)


if __name__ == "__main__":
  main(sys.argv[1:])
