"""flaxtune's version string.

It lives in a module of its own, importing nothing, so that any subpackage
can name the version (BLEU signatures carry it) without importing the
package's top level, which re-exports the model code.
"""

__version__ = "0.1.0"
