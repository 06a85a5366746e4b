"""Pieces of the experiment report: figures (`plots`), the HTML page (`html`) and the experiment table (`compare`)."""
