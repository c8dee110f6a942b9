"""The ``hirescam3d`` command line (installed as the subpackage ``hirescam3d.cli``).

A thin Typer shell over the library: :mod:`hirescam3d.pipeline` does the work, this
package parses options, shows progress and turns errors into one ``error:`` line and an
exit code (0 ok, 1 runtime failure, 2 usage error). The library never imports it.
"""
