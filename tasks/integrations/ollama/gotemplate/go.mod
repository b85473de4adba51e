module tunepipe/gotemplate

go 1.19
