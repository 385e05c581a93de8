"""What every other shared package stands on: typed configs (``config``), the artifact store over ``file://`` and
``s3://`` URIs (``store``), and the data files a workflow reads at plan time (``datafiles``).

May import: nothing
"""
