"""``python -m jobs.analyze_issue81 --config <json | path | store URI>``: run the stage."""

from jobs.analyze_issue81.stage import main

if __name__ == "__main__":
    main()
