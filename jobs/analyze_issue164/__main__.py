"""``python -m jobs.analyze_issue164 --config <json | path | store URI>``: run the stage."""

from jobs.analyze_issue164.stage import main

if __name__ == "__main__":
    main()
